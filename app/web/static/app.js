// The web view's only script: live refresh of pages marked data-refresh, and "select all".
(function () {
  "use strict";
  function wireSelectAll(root) {
    root.querySelectorAll("input.select-all").forEach(function (box) {
      box.addEventListener("change", function () {
        var form = box.closest("form");
        form.querySelectorAll("tbody input[type=checkbox]").forEach(function (item) {
          item.checked = box.checked;
        });
      });
    });
  }
  function refresh(main, seconds) {
    setTimeout(function () {
      fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
        .then(function (response) { return response.ok ? response.text() : null; })
        .then(function (html) {
          if (html) {
            var next = new DOMParser().parseFromString(html, "text/html").getElementById("live");
            if (next) { main.innerHTML = next.innerHTML; wireSelectAll(main); }
          }
        })
        .catch(function () {})
        .then(function () { refresh(main, seconds); });
    }, seconds * 1000);
  }
  document.addEventListener("DOMContentLoaded", function () {
    var main = document.getElementById("live");
    wireSelectAll(document);
    if (main && main.dataset.refresh) { refresh(main, Number(main.dataset.refresh) || 5); }
  });
})();
