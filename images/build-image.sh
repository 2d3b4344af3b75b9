#!/bin/bash
# Build the stackml GPU TensorFlow VM image with diskimage-builder, then print the command that
# uploads it to Glance under the name config/runtimes.yaml gives the runtime.
#
#   images/build-image.sh [--dry-run] [RUNTIME]
#
# RUNTIME is a key of config/runtimes.yaml (default tensorflow-2.21). --dry-run prints the
# build and upload commands without building. Environment (all optional):
#   STACKML_IMAGE_OUTPUT      output path without .qcow2 (default: ./<image name>)
#   STACKML_IMAGE_FIRMWARE    uefi (default; q35 + OVMF, for GPU passthrough) or bios
#   STACKML_IMAGE_MIN_DISK    the smallest flavor disk in GB it boots on (default 20)
#   STACKML_IMAGE_VISIBILITY  public (default), community, shared or private
#   STACKML_IMAGE_TFSERVING   1: add the tensorflow-serving element (tensorflow_model_server)
# and the DIB_* variables of the elements (see images/README.md).
set -eu
set -o pipefail

usage() {
    sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

show() { # a command line, quoted so that it can be pasted into a shell
    printf '%q' "$1"
    shift
    printf ' %q' "$@"
    echo
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

dry_run=0
runtime=""
while [ $# -gt 0 ]; do
    case "$1" in
        -n | --dry-run) dry_run=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*)
            echo "build-image.sh: unknown option $1" >&2
            usage >&2
            exit 2
            ;;
        *)
            if [ -n "$runtime" ]; then
                echo "build-image.sh: one runtime at a time" >&2
                exit 2
            fi
            runtime=$1
            ;;
    esac
    shift
done
runtime=${runtime:-tensorflow-2.21}

# The image name the openstack backend boots for this runtime: runtimes.<key>.image
image=$(awk -v key="$runtime" '
    /^[^[:space:]#]/ { top = $1 }
    top == "runtimes:" && /^  [^[:space:]#]/ { current = $1; sub(/:$/, "", current) }
    top == "runtimes:" && current == key && $1 == "image:" { gsub(/["\047]/, "", $2); print $2; exit }
' "$repo/config/runtimes.yaml")
if [ -z "$image" ]; then
    echo "build-image.sh: config/runtimes.yaml has no runtime $runtime with an image" >&2
    exit 1
fi
if [ ! -f "$here/elements/stackml-tensorflow/$runtime-gpu.txt" ]; then
    echo "build-image.sh: no GPU requirements for $runtime in elements/stackml-tensorflow/" >&2
    exit 1
fi

output=${STACKML_IMAGE_OUTPUT:-$PWD/$image}
firmware=${STACKML_IMAGE_FIRMWARE:-uefi}
min_disk=${STACKML_IMAGE_MIN_DISK:-20}
visibility=${STACKML_IMAGE_VISIBILITY:-public}
commit=$(git -C "$repo" rev-parse --short HEAD 2> /dev/null || echo unknown)

export ELEMENTS_PATH="$here/elements${ELEMENTS_PATH:+:$ELEMENTS_PATH}"
export DIB_RELEASE=${DIB_RELEASE:-bookworm}
# contrib: packages the NVIDIA CUDA repository depends on (nvidia-driver sets it too)
export DIB_DEBIAN_COMPONENTS=${DIB_DEBIAN_COMPONENTS:-main,contrib,non-free-firmware}
export DIB_STACKML_RUNTIME=$runtime
export DIB_STACKML_RUNNER=${DIB_STACKML_RUNNER:-$repo/workers/vm/runner.py}

elements=(debian-minimal vm stackml-base nvidia-driver stackml-tensorflow)
# tensorflow_model_server for serving replicas (needs DIB_TFSERVING_REPO_KEY_FINGERPRINT)
case "${STACKML_IMAGE_TFSERVING:-0}" in
    0) ;;
    1)
        if [ -z "${DIB_TFSERVING_REPO_KEY_FINGERPRINT:-}" ]; then
            echo "build-image.sh: STACKML_IMAGE_TFSERVING=1 needs DIB_TFSERVING_REPO_KEY_FINGERPRINT" >&2
            echo "(see elements/tensorflow-serving/README.rst)" >&2
            exit 2
        fi
        elements+=(tensorflow-serving)
        ;;
    *)
        echo "build-image.sh: STACKML_IMAGE_TFSERVING is 0 or 1, not $STACKML_IMAGE_TFSERVING" >&2
        exit 2
        ;;
esac
properties=(
    --property "stackml_runtime=$runtime"
    --property "stackml_commit=$commit"
    --property os_distro=debian
    --property os_version=12
    --property os_type=linux
    --property hw_disk_bus=virtio
    --property hw_vif_model=virtio
)
case "$firmware" in
    uefi)
        # GPUs with large BARs want a PCIe machine and UEFI; the image boots BIOS as well
        elements+=(block-device-efi)
        properties+=(--property hw_machine_type=q35 --property hw_firmware_type=uefi)
        ;;
    bios) ;;
    *)
        echo "build-image.sh: STACKML_IMAGE_FIRMWARE is uefi or bios, not $firmware" >&2
        exit 2
        ;;
esac

# the build needs ~15 GB of scratch space: more than a tmpfs usually has
build=(disk-image-create -a amd64 -t qcow2 --no-tmpfs -o "$output" "${elements[@]}")
upload=(
    openstack image create "$image"
    --disk-format qcow2 --container-format bare
    --file "$output.qcow2"
    "--$visibility"
    --min-disk "$min_disk"
    "${properties[@]}"
)

if [ "$dry_run" -eq 1 ]; then
    echo "# environment"
    for name in ELEMENTS_PATH DIB_RELEASE DIB_DEBIAN_COMPONENTS DIB_STACKML_RUNTIME DIB_STACKML_RUNNER; do
        printf '%s=%q\n' "$name" "${!name}"
    done
    echo "# build"
    show "${build[@]}"
else
    for tool in disk-image-create qemu-img; do
        if ! command -v "$tool" > /dev/null; then
            echo "build-image.sh: $tool not found (see images/README.md: prerequisites)" >&2
            exit 1
        fi
    done
    "${build[@]}"
fi
echo "# upload (credentials: OS_CLOUD / clouds.yaml)"
show "${upload[@]}"
