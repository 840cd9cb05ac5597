#!/usr/bin/env bash
# Checks the installs users get, away from the checkout:
#   wheel  the non-editable wheel in dist/ (`make wheel`), installed into an empty folder:
#          it ships retake_ops.ref, retake_ops._C and the C++ sources, and imported from
#          there (no editable install in sight) its C++ kernels serve the ops.
#   plain  a plain `pip install .` (build isolation, no flags) of a copy of the checkout into
#          a fresh venv holding only torch: with RETAKE_OPS_JIT=0 the import warns and the
#          references answer; then two processes importing at once compile retake_ops._C
#          once between them, both run the C++ kernels, and a later import loads the cached
#          library without compiling.
# Usage: tools/check_install.sh wheel|plain   (PY: the dev venv's python; TORCH, PYTHON as in the Makefile)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# argv: the folder retake_ops and retake_ops.ref must come from, the folder of retake_ops._C.
CHECK='
import os, sys, time, torch
os.environ.pop("RETAKE_OPS_CPU_ISA", None)  # the check wants the best set, whatever the caller forces
start = time.perf_counter()
import retake_ops
seconds = time.perf_counter() - start
package_dir, library_dir = sys.argv[1:]
for module, folder in ((retake_ops, package_dir), (retake_ops.ref, package_dir), (retake_ops._C, library_dir)):
    assert module.__file__.startswith(folder), (module.__name__, module.__file__, folder)
info = retake_ops.build_info()
compiled = {op: info["ops"][op]["cpu"]
            for op in ("frame_distance", "local_peaks", "dpselect", "nms_select", "kv_gather", "attn_scores")}
assert info["compiled"] and set(compiled.values()) == {"C++"}, info
# attn_scores tail: every instruction set built in, the best one used, each one right.
assert info["cpu_isas"] and info["cpu_isa"] == info["cpu_isas"][-1], info
q, k = torch.randn(1, 4, 37, 24), torch.randn(1, 2, 41, 24)
for isa in info["cpu_isas"]:
    os.environ["RETAKE_OPS_CPU_ISA"] = isa
    torch.testing.assert_close(torch.ops.retake.attn_scores(q, k, None, True),
                               retake_ops.ref.attn_scores(q, k, None, True), rtol=1e-4, atol=1e-5)
x = torch.randn(2, 40, 4, 32)
got, want = retake_ops.dpselect(x, 10), retake_ops.ref.dpselect(x, 10)
assert all(torch.equal(a, b) for a, b in zip(got, want))
scores = torch.randn(2, 50)
assert torch.equal(retake_ops.nms_select(scores, 6), retake_ops.ref.nms_select(scores, 6))
isas = ", ".join(info["cpu_isas"])
print(f"ok: import {seconds:.1f} s, C++ kernels from {retake_ops._C.__file__}, CPU instruction sets {isas}")
'

check_wheel() {
  local wheel
  wheel=$(ls dist/retake_ops-*.whl)
  "$PY" - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for needed in ("retake_ops/ref/__init__.py", "retake_ops/_csrc/module.cpp", "retake_ops/_csrc/cpu/dpselect.cpp",
               "retake_ops/_csrc/cpu/softmax_colsum.h", "retake_ops/_csrc/cpu/softmax_colsum_avx512.cpp"):
    assert needed in names, (needed, sys.argv[1])
assert any(n.startswith("retake_ops/_C.") and n.endswith(".so") for n in names), names
print(f"{sys.argv[1]}: ships retake_ops.ref, retake_ops._C and the C++ sources")
EOF
  "$PY" -m pip install -q --no-deps --target "$tmp/site" "$wheel"
  local deps
  deps=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
  # -S: no site-packages and no .pth files, so nothing of the editable install; torch & co.
  # come from the dev venv's site-packages after the wheel's folder.
  (cd "$tmp" && PYTHONPATH="$tmp/site:$deps" "$PY" -S -W error::RuntimeWarning -c "$CHECK" "$tmp/site" "$tmp/site")
}

check_plain() {
  "$PYTHON" -m venv "$tmp/venv"
  "$tmp/venv/bin/pip" install -q "$TORCH"
  # The files a clone would have (tracked, plus new ones not ignored): no build outputs.
  mkdir "$tmp/src"
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    tar --null -T - -cf - | tar -xf - -C "$tmp/src"
  local start=$SECONDS
  "$tmp/venv/bin/pip" install -q "$tmp/src"
  echo "plain pip install: $((SECONDS - start)) s"
  local site
  site=$("$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  export RETAKE_OPS_CACHE_DIR="$tmp/cache"
  cd "$tmp"
  # RETAKE_OPS_JIT=0: no compiling, one warning, the references answer.
  RETAKE_OPS_JIT=0 "$tmp/venv/bin/python" -c '
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import retake_ops
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(messages) == 1 and "RETAKE_OPS_JIT=0 disables compiling it on import" in messages[0], messages
assert retake_ops.build_info()["ops"]["dpselect"]["cpu"] == "reference"
x = torch.randn(1, 20, 2, 8)
assert all(torch.equal(a, b) for a, b in zip(retake_ops.dpselect(x, 5), retake_ops.ref.dpselect(x, 5)))
' 2>err0
  if grep -q "compiling" err0 || [ -e "$tmp/cache" ]; then echo "RETAKE_OPS_JIT=0 compiled:"; cat err0; exit 1; fi
  echo "RETAKE_OPS_JIT=0: one warning, references, nothing compiled"
  start=$SECONDS
  local pids=()
  for i in 1 2; do
    "$tmp/venv/bin/python" -W error::RuntimeWarning -c "$CHECK" "$site" "$tmp/cache" >"out$i" 2>"err$i" &
    pids+=($!)
  done
  local failed=0
  for i in 1 2; do
    wait "${pids[$((i - 1))]}" || { failed=1; echo "import $i failed:"; cat "err$i"; }
  done
  [ "$failed" = 0 ]
  echo "first imports (two at once): $((SECONDS - start)) s"
  cat out1 out2 err1 err2
  local builds
  builds=$(cat err1 err2 | grep -c "retake-ops: first import, compiling" || true)
  [ "$builds" = 1 ] || { echo "expected one compile between the two imports, saw $builds"; exit 1; }
  "$tmp/venv/bin/python" -W error::RuntimeWarning -c "$CHECK" "$site" "$tmp/cache" 2>err3
  if grep -q "compiling" err3; then echo "a later import compiled again:"; cat err3; exit 1; fi
  echo "plain install: compiled once on first import, loaded from the cache after"
}

case "${1:-}" in
  wheel) check_wheel ;;
  plain) check_plain ;;
  *) echo "usage: $0 wheel|plain" >&2; exit 2 ;;
esac
