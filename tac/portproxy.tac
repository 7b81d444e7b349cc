# The portproxy service for twistd -y:
#
#     PORTPROXY_CONFIG=map.yaml twistd -ny tac/portproxy.tac
#
# It is the same service as 'twistd portproxy -c map.yaml'.
import os
import sys

from twisted.application.service import Application

from twistedproxy.tap import serviceForMap

path = os.environ.get("PORTPROXY_CONFIG")
if not path:
    sys.exit("portproxy.tac: set PORTPROXY_CONFIG to the map file to serve")

application = Application("portproxy")
serviceForMap(path).setServiceParent(application)
