#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real: chromium (browser
# test of the app) and orthanc (DICOMweb round trip). Skips what is present;
# never fails the run when apt is unavailable (the tests that need them skip
# with a message saying so).
set -u
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc orthanc-dicomweb)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != "0" ] && ! command -v sudo >/dev/null 2>&1; then
  echo "system-deps: not root, cannot install ${need[*]}; tests needing them will skip" >&2
  exit 0
fi
SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
echo "system-deps: installing ${need[*]}" >&2
$SUDO apt-get update -qq >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
  || echo "system-deps: apt-get install ${need[*]} failed; tests needing them will skip" >&2
exit 0
