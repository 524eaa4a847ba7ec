#!/usr/bin/env bash
# Install what the test suite needs, where it is missing: Debian packages,
# schemathesis and asciinema from PyPI, and the four real agent CLIs under
# /opt/agentvm-agents (aider from PyPI; claude-code, codex and opencode from
# npm), at the versions the tests pin. Needs root and the package
# registries; quick when everything is already there. ./test.sh runs it
# when it runs as root.
set -euo pipefail
need=()
command -v git >/dev/null 2>&1 || need+=(git)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v script >/dev/null 2>&1 || need+=(bsdutils)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v sha256sum >/dev/null 2>&1 || need+=(coreutils)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
# the web UI's browser test: Debian's Chromium (driven by playwright-core, below)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# images build --debian, with the real tool, as root
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap debian-archive-keyring)
/usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
command -v pip3 >/dev/null 2>&1 || python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# schemathesis runs against our /openapi.json inside the test suite
if ! command -v st >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check "schemathesis==4.32.5"
fi

# asciinema's own parser checks our job recordings (asciicast v2)
if ! command -v asciinema >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check "asciinema==2.4.0"
fi

# the real aider CLI, offline against a scripted model (tests/suite/agents.rs);
# built from Debian's Python so the sandbox (which shows /usr, not /root)
# can run it
AIDER=/opt/agentvm-agents/aider
if [ ! -x "$AIDER/bin/aider" ]; then
  /usr/bin/python3 -m venv "$AIDER"
  "$AIDER/bin/pip" install --quiet --disable-pip-version-check "aider-chat==0.86.2"
  chmod -R a+rX /opt/agentvm-agents
fi

# the real claude-code CLI (Node), likewise
CLAUDE=/opt/agentvm-agents/claude
if [ ! -x "$CLAUDE/node_modules/.bin/claude" ]; then
  mkdir -p "$CLAUDE"
  (cd "$CLAUDE" && npm install --silent --no-audit --no-fund "@anthropic-ai/claude-code@2.1.197")
  chmod -R a+rX /opt/agentvm-agents
fi

# codex and opencode (npm packages that carry native binaries), likewise
CODEX=/opt/agentvm-agents/codex
if [ ! -x "$CODEX/node_modules/.bin/codex" ]; then
  mkdir -p "$CODEX"
  (cd "$CODEX" && npm install --silent --no-audit --no-fund "@openai/codex@0.169.0")
  chmod -R a+rX /opt/agentvm-agents
fi
OPENCODE=/opt/agentvm-agents/opencode
if [ ! -x "$OPENCODE/node_modules/.bin/opencode" ]; then
  mkdir -p "$OPENCODE"
  (cd "$OPENCODE" && npm install --silent --no-audit --no-fund "opencode-ai@1.18.33")
  chmod -R a+rX /opt/agentvm-agents
fi

# playwright-core (no browser download: it drives Debian's Chromium) for
# the web UI's test in a real browser
WEB=/opt/agentvm-web-tests
if [ ! -d "$WEB/node_modules/playwright-core" ]; then
  mkdir -p "$WEB"
  (cd "$WEB" && npm install --silent --no-audit --no-fund "playwright-core@1.64.1")
  chmod -R a+rX "$WEB"
fi
