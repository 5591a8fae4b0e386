# shellcheck shell=bash
# Sourced by ./dev and scripts/deps-*.sh: installs Debian packages with apt-get. Root runs apt-get
# itself, as it always did; another user goes through `sudo -n` (never a password prompt: ./dev
# also runs unattended), and when that is not possible is told what to install, and the step fails.

# sp_can_install: whether apt-get can be run as root from here (root, or password-less sudo).
sp_can_install() {
  [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }
}

# sp_as_root command...: run a command as root (directly when root, else with sudo -n).
sp_as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  else
    sudo -n "$@"
  fi
}

# sp_apt_install package...: install Debian packages; the package lists are refreshed at most once
# per shell, shared by every caller. Without root and password-less sudo it prints what to install
# (on stderr) and returns 1 without trying.
sp_apt_install() {
  if ! sp_can_install; then
    local why="sudo is not installed"
    if command -v sudo >/dev/null 2>&1; then
      why="sudo -n cannot run without a password"
    fi
    {
      echo "!! ./dev needs the Debian packages: $*"
      echo "!! it is not root and $why; install them yourself, then run it again:"
      echo "!!   sudo apt-get update && sudo apt-get install -y $*"
    } >&2
    return 1
  fi
  if [ -z "${_SESSION_PROXY_APT_UPDATED:-}" ]; then
    sp_as_root apt-get update -qq || return 1
    _SESSION_PROXY_APT_UPDATED=1
  fi
  # sudo resets the environment, so the frontend goes through env either way.
  sp_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}
