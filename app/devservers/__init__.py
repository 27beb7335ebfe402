"""Development stand-ins for the outside world: an SMTP server and a payment gateway."""
