#!/usr/bin/env bash
# Screenshot an HTML report (e.g. the one `safediff demo` writes) with headless Chromium, offline.
#
#   benchmarks/screenshot_report.sh demo-run/report.html /tmp/report.png [WIDTH] [HEIGHT]
#
# Needs /usr/bin/chromium (Debian: apt-get install -y chromium). The page is self-contained (images inlined), so
# no network is used; a throw-away profile keeps the run from touching any user's browser profile.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 REPORT.html OUT.png [WIDTH=1280] [HEIGHT=2000]" >&2
  exit 2
fi
report=$(realpath "$1")
png=$(realpath -m "$2")
width=${3:-1280}
height=${4:-2000}
browser=${CHROMIUM:-/usr/bin/chromium}
[ -f "$report" ] || { echo "error: no report at $report" >&2; exit 2; }
[ -x "$browser" ] || { echo "error: $browser not found (apt-get install -y chromium, or set CHROMIUM)" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --no-first-run --hide-scrollbars --user-data-dir="$profile" --screenshot="$png" \
  --window-size="$width,$height" "file://$report" 2>/dev/null
echo "wrote $png"
