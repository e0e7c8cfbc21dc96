"""Models: the load path (:mod:`.load`: directories, GGUF files, the demo), GGUF files
(:mod:`.gguf`), random-weight test models (:mod:`.builder`, :mod:`.gguf_builder`) and the
real test models (:mod:`.real_models`)."""
