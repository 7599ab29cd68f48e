"""persres inside ComfyUI: LAG's one-pass regions in ComfyUI's own sampler, for persres concepts and any LoRA.

- `nodes`: the node classes ComfyUI loads (`PersresConcepts`, `PersresRegions`), each one library call.
- `concepts`: a node's `concepts` text ("name[:strength], ...") resolved against the persres registry
  and ComfyUI's `loras` folder, bound to the prompt, turned into ComfyUI's own LoRA patches.
- `patch`: LAG on a ComfyUI model through ComfyUI's patch points (object patches on each changed
  layer's `forward`, the attn2 replacement slot, sampler wrappers), undone with the model clone.
- `apply`: the library calls the nodes make.
- `install`: `persres comfyui install`, the `custom_nodes` entry.

Only `nodes`, `concepts`, `patch` and `apply` import ComfyUI (`comfy`), and only when called from
inside it; `install` and this package do not.
"""

NODE_PACK = "persres"  # the custom_nodes folder name, the node category and the model attachment key
