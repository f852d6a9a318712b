#!/usr/bin/env bash
# The test suite: set up .venv with the locked versions if needed, then run pytest. Extra arguments go to pytest.
#   ./scripts/test.sh --latest [pytest args]   the same suite in a fresh .venv-latest built from the newest
#                                             releases (not the lock); on a pass, scripts/lock.sh makes them the lock.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = "--latest" ]; then
  shift
  export MOE_LATEST=1
fi
source scripts/setup_env.sh || exit 1
set +e  # setup_env.sh sets -e; pytest's exit status is handled below
rm -f "$VENV/.suite-passed"
"$VENV/bin/python" -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
  echo "error: pytest collected no tests; that is a failure, not a pass" >&2
  exit 1
fi
if [ $rc -eq 0 ] && [ $# -eq 0 ]; then
  date -u +%FT%TZ >"$VENV/.suite-passed"   # the whole suite passed in this environment (read by scripts/lock.sh)
fi
if [ "${MOE_LATEST:-0}" = 1 ]; then
  echo "== newest releases vs requirements/lock.txt (suite exit status $rc) ==" >&2
  "$VENV/bin/python" scripts/lock_diff.py requirements/lock.txt "$VENV" >&2
fi
exit $rc
