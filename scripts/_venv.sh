# Sourced by the scripts: the TransformerLens line (TL_LINE: 4, the default, or 3) and its venv
# ($BEYOND_TOP1_VENV, default .venv for 4.x and .venv-tl3 for 3.9).
case "${TL_LINE:-4}" in
  4) VENV=${BEYOND_TOP1_VENV:-.venv}; TL_SPEC="transformer-lens>=4,<5" ;;
  3) VENV=${BEYOND_TOP1_VENV:-.venv-tl3}; TL_SPEC="transformer-lens>=3.9,<4" ;;
  *) echo "TL_LINE must be 3 or 4, got '${TL_LINE}'" >&2; exit 2 ;;
esac
