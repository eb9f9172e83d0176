#!/usr/bin/env bash
# Run the README's test command under every Python >= 3.10 this machine has, each in a fresh
# clone with a fresh virtual environment, and print one table row per interpreter.
#
#   scripts/test-pythons.sh [python3.10 python3.12 ...]   (default: every python3.X found)
#
# Interpreters come from the arguments, else from `pyenv versions` and `python3.X` on PATH.
# Each run's full log is kept under $KVTIER_PYTHONS_DIR (default: a new temporary folder).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${KVTIER_PYTHONS_DIR:-$(mktemp -d)}
mkdir -p "$work"

find_pythons() {
    local seen="" exe
    if command -v pyenv >/dev/null 2>&1; then
        for v in $(pyenv versions --bare 2>/dev/null); do
            exe="$(pyenv root)/versions/$v/bin/python3"
            [ -x "$exe" ] && echo "$exe"
        done
    fi
    for minor in $(seq 10 20); do
        exe=$(command -v "python3.$minor" 2>/dev/null) && echo "$exe"
    done
}

interpreters=("$@")
if [ ${#interpreters[@]} -eq 0 ]; then
    mapfile -t interpreters < <(find_pythons)
fi

declare -A by_version
for exe in "${interpreters[@]}"; do
    version=$("$exe" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
    minor=${version#3.}
    [ "${version%%.*}" = 3 ] && [ "$minor" -ge 10 ] 2>/dev/null || continue
    [ -n "${by_version[$version]:-}" ] || by_version[$version]=$exe
done

rows=()
failed=0
for version in $(printf '%s\n' "${!by_version[@]}" | sort -t. -k2 -n); do
    exe=${by_version[$version]}
    dir="$work/py$version"
    rm -rf "$dir" && git clone -q "$repo" "$dir"
    echo "== Python $version ($exe): $dir/test.log" >&2
    start=$(date +%s)
    (cd "$dir" && "$exe" -m venv .venv && . .venv/bin/activate \
        && pip install -q torch==2.13.0 -e '.[test]' && python -m pytest -q -p no:cacheprovider) > "$dir/test.log" 2>&1
    rc=$?
    [ $rc -eq 0 ] || failed=1
    summary=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error).* =+$|[0-9]+ passed' "$dir/test.log" | tail -n 1)
    [ -n "$summary" ] || summary="no pytest summary (see the log)"
    rows+=("| $version | $(printf '%s' "${exe}") | $([ $rc -eq 0 ] && echo pass || echo "FAIL (exit $rc)") | ${summary//|/\/} | $(( $(date +%s) - start )) s |")
done

echo "| Python | interpreter | result | pytest summary | time |"
echo "| --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
exit $failed
