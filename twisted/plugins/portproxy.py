from twisted.application.service import ServiceMaker

portproxy = ServiceMaker(
    "portproxy",
    "twistedproxy.tap",
    "Forward TCP and UDP ports as a YAML map says, reloaded on SIGHUP.",
    "portproxy",
)
