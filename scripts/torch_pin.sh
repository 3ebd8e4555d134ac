# The torch build every venv gets, installed before anything else (sourced by setup_env.sh and
# check_floors.sh): an unpinned torch would pull a different (multi-GB) build.
TORCH_PIN=(torch==2.14.1 torchvision==0.29.1)
