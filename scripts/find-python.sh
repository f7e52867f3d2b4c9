# Sourced by .ci/run and the README commands: sets PY to a Python >= 3.12 interpreter,
# preferring 3.12 (the version the GPU machine runs), then any newer one; looks on PATH and in pyenv.
PY=""
_pyenv_dir="${PYENV_ROOT:-$HOME/.pyenv}/versions"
for cand in python3.12 $(ls -d "$_pyenv_dir"/3.12*/bin/python 2>/dev/null | sort -rV) \
            python3.13 python3 $(ls -d "$_pyenv_dir"/3.1[3-9]*/bin/python 2>/dev/null | sort -rV); do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
    PY="$(command -v "$cand")"
    break
  fi
done
if [ -z "$PY" ]; then
  echo "error: jaxeff needs Python >= 3.12 (none found on PATH or in pyenv)" >&2
  return 2 2>/dev/null || exit 2
fi
