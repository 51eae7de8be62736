"""The vocabulary: argument types, the one command table (each entry bound to its handler),
the handlers, named descriptors and the introspection rendered from the table."""
