"""`linearize compare`: several attention families (and/or --keep-softmax K values) at the same token budget."""
