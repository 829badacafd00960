"""Model families, one module each; a module registers its entry in
:data:`recjax.registry.MODELS`, which imports it the first time its name is looked up."""
