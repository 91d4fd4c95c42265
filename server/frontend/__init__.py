"""The HTTP process's side of the engine: everything here runs in the front end, never in the engine process.

The engine client (:mod:`.client`, multiprocess; :mod:`.local_client`, in-process), what it follows per
request (:mod:`.request_state`, :mod:`.tracker`, :mod:`.detokenizer`), admission control (:mod:`.admission`),
the task tensors shipped to the engine (:mod:`.prefix_shipping`), the engine process's supervisor
(:mod:`.supervisor`) and the grammar checker's child process (:mod:`.grammar_check`). They speak to
:mod:`server.engine` only through :mod:`server.engine.protocol`'s messages and the engine's own types;
nothing in ``server/engine`` imports from here.
"""
