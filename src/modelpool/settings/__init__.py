"""The options (each defined once) and the checked configuration made from them."""
