#!/usr/bin/env bash
# Debian's Chromium for the tests that look at web pages as a person would (root, Debian).
set -euo pipefail
command -v chromium >/dev/null && exit 0
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
