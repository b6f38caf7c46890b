#!/bin/sh
# Print the path of a Python 3.12 interpreter (lerobot 0.6 needs 3.12), or say what to install.
# Looked for: python3.12 on PATH, then pyenv's installed 3.12.x versions (pyenv need not be on PATH).
pyenv_root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for candidate in python3.12 "$pyenv_root"/versions/3.12*/bin/python3.12; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
        command -v "$candidate"
        exit 0
    fi
done
echo "error: craft_ext needs Python 3.12 (lerobot 0.6 requires it) and none was found on PATH or in pyenv." >&2
echo "Install it (e.g. 'pyenv install 3.12', or your distribution's python3.12 with its venv module) and re-run." >&2
exit 1
