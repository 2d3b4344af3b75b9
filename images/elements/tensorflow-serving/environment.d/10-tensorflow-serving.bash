# shellcheck shell=bash
export DIB_TFSERVING_REPO=${DIB_TFSERVING_REPO:-https://storage.googleapis.com/tensorflow-serving-apt}
export DIB_TFSERVING_REPO_KEY=${DIB_TFSERVING_REPO_KEY:-tensorflow-serving.release.pub.gpg}
# no default: check the key's fingerprint out of band and set it (the build prints what it got)
export DIB_TFSERVING_REPO_KEY_FINGERPRINT=${DIB_TFSERVING_REPO_KEY_FINGERPRINT:-}
export DIB_TFSERVING_PACKAGE=${DIB_TFSERVING_PACKAGE:-tensorflow-model-server}
export DIB_TFSERVING_VERSION=${DIB_TFSERVING_VERSION:-}
