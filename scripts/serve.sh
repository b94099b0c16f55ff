#!/usr/bin/env bash
# Install everything, then start the service on the built-in demo. With no REDIS_URL
# an embedded Redis and one local worker are started. Extra args go to `serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/influence-service serve "$@"
