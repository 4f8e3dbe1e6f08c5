#!/usr/bin/env bash
# The browser test needs Debian's Chromium and its WebDriver. Install them
# when they are missing (CI machines start without them); CAIRN_CHROMIUM
# and CAIRN_CHROMEDRIVER point the test at other binaries instead.
set -euo pipefail
if [[ -n "${CAIRN_CHROMEDRIVER:-}" ]] || { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  exit 0
fi
echo "installing Debian's chromium and chromium-driver for the browser test"
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
command -v chromedriver >/dev/null
