"""The command line's commands: one module per command, each with ``add_arguments(parser)`` and ``main(args)``
(:mod:`squeezekv.cli` dispatches to them), and :mod:`~squeezekv.commands.cache_args`, the cache arguments they share
(read into one :class:`~squeezekv.spec.CacheSpec`). Importing this package imports neither torch nor
transformers."""
