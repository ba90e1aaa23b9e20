"""Model families, each written once: ``internvit.py`` (the image encoder), ``qwen2.py`` (the
language model), ``internvl.py`` (how InternVL joins them). The exporter, internvl-make-tiny, the
reference and the benchmark's converters read dimensions, checkpoint names and layers from here."""
