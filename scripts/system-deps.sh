#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real: chromium (browser
# tests of the app and the audit report), orthanc + its DICOMweb plugin (DICOMweb
# round trip) and iproute2 (`ip`, used with `unshare -n` to keep the Ray test
# cluster on loopback). Skips what is present.
#
# When something is missing and cannot be installed (no root and no sudo, or
# apt-get fails), it says what and why and exits 1, so `make test` stops there
# instead of passing with those tests skipped. A developer who accepts the skips
# can set SYSTEM_DEPS_OPTIONAL=1 (then it warns and exits 0), except under CI=true,
# where the tests that would skip fail anyway (tests/ci_required.py).
set -u

missing() {
  local need=()
  [ -x /usr/bin/chromium ] || need+=(chromium)
  # Debian puts the binary in /usr/sbin (not on a non-root PATH) and the DICOMweb
  # plugin in its own package: check both, install what is missing.
  { command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } || need+=(orthanc)
  compgen -G '/usr/share/orthanc/plugins/libOrthancDicomWeb.so*' >/dev/null \
    || compgen -G '/usr/lib/orthanc/libOrthancDicomWeb.so*' >/dev/null || need+=(orthanc-dicomweb)
  { command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ]; } || need+=(iproute2)
  command -v unshare >/dev/null 2>&1 || need+=(util-linux)
  echo "${need[@]}"
}

fail() {
  echo "system-deps: ERROR: $1" >&2
  echo "system-deps: the browser, Orthanc and Ray tests need: $2" >&2
  echo "system-deps: install them (sudo apt-get install $2), or set SYSTEM_DEPS_OPTIONAL=1 to let those tests skip (not under CI=true)" >&2
  if [ "${SYSTEM_DEPS_OPTIONAL:-}" = "1" ] && [ "${CI:-}" != "true" ]; then
    echo "system-deps: SYSTEM_DEPS_OPTIONAL=1: continuing; the tests needing them will skip" >&2
    exit 0
  fi
  exit 1
}

need=$(missing)
[ -z "$need" ] && exit 0
if [ "$(id -u)" != "0" ] && ! command -v sudo >/dev/null 2>&1; then
  fail "not root and no sudo: cannot install ${need}" "$need"
fi
SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo -n"
command -v apt-get >/dev/null 2>&1 || fail "no apt-get on this system: cannot install ${need}" "$need"
echo "system-deps: installing ${need}" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
$SUDO apt-get update -qq >"$log" 2>&1 || echo "system-deps: apt-get update failed (trying the install anyway)" >&2
# shellcheck disable=SC2086 # word splitting of the package list is intended
if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need >>"$log" 2>&1; then
  tail -n 5 "$log" >&2
  fail "apt-get install ${need} failed" "$need"
fi
still=$(missing)
[ -z "$still" ] || fail "installed, but still missing: ${still}" "$still"
echo "system-deps: installed ${need}" >&2
exit 0
