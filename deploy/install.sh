#!/usr/bin/env bash
# Set up alforge on a fresh Debian machine: a virtual environment in .venv with the CPU build of
# PyTorch installed first (so pip never pulls a multi-GB CUDA build), then alforge and its deps.
#   deploy/install.sh          Python environment only (enough for the demo campaign)
#   deploy/install.sh --dft    also the real electronic-structure codes from Debian
#                              (Quantum ESPRESSO, CP2K, xtb) and PySCF, used by the labelling tests,
#                              and Debian's PostgreSQL server, which the store tests start on loopback
#                              (tests/conftest.py: postgres_url), with the alforge[postgres] extra
#                              (psycopg) they need, and Debian's chromium, whose headless mode
#                              screenshots the Prefect UI (tests/test_deployment.py); CI runs this
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

want_dft=0
[[ "${1:-}" == "--dft" ]] && want_dft=1

if (( want_dft )); then
  pkgs=(quantum-espresso quantum-espresso-data cp2k cp2k-data xtb postgresql chromium)
  missing=()
  for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if (( ${#missing[@]} )); then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip=(.venv/bin/pip install -q --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
extras="test"
(( want_dft )) && extras="test,dft,postgres"
need=0
.venv/bin/python -c "import alforge, prefect, mace" 2>/dev/null || need=1
[[ -f .venv/.alforge-installed && ! pyproject.toml -nt .venv/.alforge-installed ]] || need=1
if (( want_dft )); then .venv/bin/python -c "import pyscf, psycopg" 2>/dev/null || need=1; fi
if (( need )); then
  "${pip[@]}" -e ".[${extras}]"
  touch .venv/.alforge-installed
fi
.venv/bin/python -c "import psycopg" 2>/dev/null ||
  echo "PostgreSQL stores need psycopg: .venv/bin/pip install -e '.[postgres]' (SQLite, the default, does not)"
echo "alforge environment ready: $(.venv/bin/python -c 'import alforge, torch, prefect; print("alforge", alforge.__version__, "| torch", torch.__version__, "| prefect", prefect.__version__)')"
