"""Image data: decoding, tf.data pipelines, the manifest, artifact readers and caches; download sources."""
