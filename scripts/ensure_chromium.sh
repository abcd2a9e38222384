#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test when it is missing. Never downloads a browser
# build of Playwright's own. Without root or apt the browser test skips and says why.
set -u
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing Debian chromium for the browser test ..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "WARNING: could not install chromium; the browser test will be skipped"
else
  echo "NOTE: /usr/bin/chromium missing and no root apt-get; the browser test will be skipped"
fi
exit 0
