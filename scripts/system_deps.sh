#!/usr/bin/env bash
# The system packages the test-suite talks to, checked in one place for `make test` and `.ci/run`: a real
# redis-server, Debian's chromium (driven by the browser tests through Playwright) with fonts-liberation (so
# screenshots have legible text), and a PostgreSQL server (the money tests run a second time on it).
# As root (CI) it installs what is missing; otherwise it prints the one command that does, and fails.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ "$(dpkg-query -W -f='${Status}' fonts-liberation 2>/dev/null || true)" = "install ok installed" ] || missing+=(fonts-liberation)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
((${#missing[@]})) || exit 0

install="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "The test-suite needs system packages that are missing: ${missing[*]}. Install them with:" >&2
  echo "  sudo sh -c '$install'" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "The test-suite needs ${missing[*]} (Debian package names), and there is no apt-get here to install them." >&2
  exit 1
fi
echo "== apt-get install ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${missing[@]}" </dev/null
