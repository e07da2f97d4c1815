"""Tokenizers and vocabulary tensors with MergeKit 0.1.5's meaning: the output vocabulary built at
plan time (`build`), inputs' embeddings re-indexed to it by a checkpoint view (`view`), chat
templates (`chat`), the YAML keys (`settings`). `moemerge.tokenizers_merge` wires them in."""
