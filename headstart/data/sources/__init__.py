"""Where the download stage's images come from: presets, URLs, archives, IDX files and class folders."""
