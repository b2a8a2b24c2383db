"""A frozen Hugging Face causal LM with CCA and an encoder added, its copy prior and its output head;
`from_pretrained` for a saved model of either kind."""
