// A StatsD backend for the tests: appends each flush to `jsonLinesFile` as one JSON line,
// so a test can read what the real daemon aggregated and flushed.
var fs = require("fs");

exports.init = function (startupTime, config, events) {
  events.on("flush", function (timestamp, metrics) {
    var line = JSON.stringify({
      timestamp: timestamp,
      counters: metrics.counters,
      timers: metrics.timers,
      gauges: metrics.gauges,
    });
    fs.appendFileSync(config.jsonLinesFile, line + "\n");
  });
  return true;
};
