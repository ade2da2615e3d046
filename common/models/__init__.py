"""Models: loading, LoRA, forwards, saving, the reward model and answer sampling.

Loading, adapting and saving causal language models, for every stage.

- A hub id and a local directory go through the same `from_pretrained` calls; `trust_remote_code` is off
  unless asked for.
- The tokenizer always gets a pad token distinct from EOS (a pad equal to EOS masks the real EOS out of
  every loss and score): an unused special token of its own when it has one, else an added "<pad>", with
  the embeddings resized to a multiple of 64.
- Under ZeRO-3 the model is created already partitioned (transformers' HfDeepSpeedConfig hook), and
  saving gathers the partitions one parameter at a time onto rank 0.
- LoRA goes through peft; on save the adapters are merged into the weights, so the output is a plain
  Hugging Face model that loads without peft.

Modules: `loading` (tokenizer, pad token, config, causal LM), `weights` (checkpoint files and the
missing/unexpected-key check), `forward` (response-only logits, the LM loss), `lora` (peft adapters and
their merge), `saving` (ZeRO-3 gathering, Hugging Face directories), `reward_model` (trunk + scalar
head), `sampling` (the one way answers are sampled).
"""
