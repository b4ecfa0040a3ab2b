"""`moeify convert`: the options, the plan, the upcycling methods and the streaming conversion itself.

The converter (`moeify.convert.converter.convert`) reads a dense checkpoint, asks `moeify.formats` which output
class represents the requested MoE exactly, builds each MoE layer with the methods in `methods/`, and writes the
result atomically through `moeify.io`.
"""
