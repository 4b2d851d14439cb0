#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine (as root) and run it:
# Dovecot from Debian's packages when missing, this package with its [test] extra, then
# ruff and the whole pytest suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need_dovecot=0
for f in /usr/bin/doveadm /usr/lib/dovecot/imap /usr/lib/dovecot/modules/lib20_virtual_plugin.so; do
  [ -e "$f" ] || need_dovecot=1
done
if [ "$need_dovecot" = 1 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup-and-test: Dovecot is missing and this is not root; live tests will skip" >&2
  else
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq dovecot-core dovecot-imapd dovecot-dev >/dev/null
  fi
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'
python3 -m ruff check .
exec python3 -m pytest -q -p no:cacheprovider "$@"
