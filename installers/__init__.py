"""The service templates (systemd unit, launchd plist), shipped as `llmtap.installers` package
data, and the install script of a checkout (install.sh)."""
