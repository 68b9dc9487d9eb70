# The submitting half of every slurm/*.sbatch script, sourced when a script runs on the login node
# (`bash slurm/X.sbatch [SBATCH OPTIONS --] ARGS`) instead of inside a job.
#
# One style for every script:
#   - options before `--` go to sbatch for the script's main job (they override its #SBATCH lines:
#     --gpus-per-node=0 --cpus-per-task=2 --mem=8G --time=30 --partition=... --array=0-31 ...);
#     IMG_SBATCH_ARGS holds options for every job the script submits (account, partition, qos);
#     IMG_FINAL_SBATCH_ARGS those of the dependent job of preprocess.sbatch / eval.sbatch;
#     sbatch's own SBATCH_* variables (SBATCH_PARTITION, SBATCH_GPUS_PER_NODE, ...) work too;
#   - the log directory (IMG_LOG_DIR, default logs/) is made before submitting: SLURM needs the
#     directory of --output when the job starts, and a job whose log cannot be opened fails with
#     nothing but a line in slurmd's log on the node;
#   - arguments are checked (the stage's --print-config) before anything is submitted, so a typo
#     fails here and not after hours in the queue;
#   - it prints every job id and where each job writes its log and its output.

IMG_LOG_DIR=${IMG_LOG_DIR:-logs}

img_die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

# img_split_args ARGS...: sets IMG_OPTS (sbatch options, before `--`) and IMG_ARGS (the rest).
img_split_args() {
    IMG_OPTS=()
    IMG_ARGS=()
    local arg has_separator=0
    for arg in "$@"; do [[ "$arg" == "--" ]] && has_separator=1 && break; done
    if ((has_separator)); then
        while [[ "$1" != "--" ]]; do
            [[ "$1" == -* || ${#IMG_OPTS[@]} -gt 0 ]] \
                || img_die "'$1' before '--' is not an sbatch option (usage: bash $0 [SBATCH OPTIONS --] ARGS)"
            IMG_OPTS+=("$1")
            shift
        done
        shift
    fi
    IMG_ARGS=("$@")
}

# img_option NAME SHORT DEFAULT OPTIONS...: the last value of --NAME=V / --NAME V / -S V, or DEFAULT.
img_option() {
    local name=$1 short=$2 value=$3
    shift 3
    while [[ $# -gt 0 ]]; do
        case "$1" in
            "--$name="*) value=${1#*=} ;;
            "--$name" | "$short") [[ $# -gt 1 ]] && value=$2 && shift ;;
        esac
        shift
    done
    echo "$value"
}

# img_submit OUTPUT_PATTERN SBATCH_OPTIONS... -- SCRIPT [ARGS...]: submits, prints the job id.
img_submit() {
    local pattern=$1 dir
    shift
    local opts=()
    while [[ "$1" != "--" ]]; do
        opts+=("$1")
        shift
    done
    shift
    mkdir -p "$IMG_LOG_DIR"
    for dir in "$(img_option output -o "" "${opts[@]}")" "$(img_option error -e "" "${opts[@]}")"; do
        dir=$(dirname "${dir:-.}")
        [[ "$dir" == *%* ]] || mkdir -p "$dir"  # a log directory of the user's own too
    done
    # shellcheck disable=SC2086
    sbatch --parsable --output="$IMG_LOG_DIR/$pattern" ${IMG_SBATCH_ARGS:-} "${opts[@]}" "$@" | cut -d';' -f1
}

# img_log NAME_DEFAULT ID PATTERN OPTIONS...: where the job's log is (%x, %j, %A filled in).
img_log() {
    local name id=$2 pattern output
    name=$(img_option job-name -J "$1" "${@:4}")
    output=$(img_option output -o "$IMG_LOG_DIR/$3" "${@:4}")
    output=${output//%x/$name}
    output=${output//%j/$id}
    output=${output//%A/$id}
    echo "${output//%a/<task>}"
}
