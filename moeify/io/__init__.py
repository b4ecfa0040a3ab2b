"""Files and sources: checkpoints read lazily, the streaming safetensors writer, atomic output folders, Hub ids,
folders and GGUF files as sources, publishing to the Hub, and peft adapter folders."""
