"""Tools around trained models, each run as python -m tools.NAME: predict, maps, embed, export; bench and
device_check for speed."""
