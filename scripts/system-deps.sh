#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real: chromium (browser
# test of the app) and orthanc (DICOMweb round trip). Skips what is present;
# never fails the run when apt is unavailable (the tests that need them skip
# with a message saying so).
set -u
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
# Debian puts the binary in /usr/sbin (not on a non-root PATH) and the DICOMweb
# plugin in its own package: check both, install what is missing.
{ command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } || need+=(orthanc)
compgen -G '/usr/share/orthanc/plugins/libOrthancDicomWeb.so*' >/dev/null \
  || compgen -G '/usr/lib/orthanc/libOrthancDicomWeb.so*' >/dev/null || need+=(orthanc-dicomweb)
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
