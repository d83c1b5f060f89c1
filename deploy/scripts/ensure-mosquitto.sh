#!/usr/bin/env bash
# Make sure a Mosquitto broker binary is available: the embedded broker, the demo and the
# integration tests start their own instances of it.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "mosquitto is missing: installing it with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  exit 0
fi
cat >&2 <<'MSG'
Outpost needs the Mosquitto MQTT broker, and it is not installed.
  Debian/Ubuntu:  sudo apt-get install mosquitto
  Fedora:         sudo dnf install mosquitto
  macOS:          brew install mosquitto
Then run the command again.
MSG
exit 1
