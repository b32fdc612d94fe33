"""Image data: decoding, tf.data pipelines, the manifest and the artifact readers; sources for the download stage."""
