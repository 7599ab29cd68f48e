"""persres inside ComfyUI: LAG's one-pass regions in ComfyUI's own sampler, for persres concepts and any LoRA.

- `nodes`: the node classes ComfyUI loads (`PersresConcepts`, `PersresRegions`), each one library call.
- `concepts`: a node's `concepts` text ("name[:strength], ...") resolved against the persres registry
  and ComfyUI's `loras` folder, bound to the prompt, turned into ComfyUI's own LoRA patches.
- `patch`: LAG on a ComfyUI model through ComfyUI's patch points (object patches on each changed
  layer's `forward`, the attn2 replacement slot, sampler wrappers), undone with the model clone.
- `apply`: the library calls the nodes make.
- `install`: `persres comfyui install`, the `custom_nodes` entry; `workflows/`: the example workflows.
- `graph`: a workflow drawn as its node graph, for the docs.

Only `apply` and `patch` import ComfyUI (`comfy`, `folder_paths`), inside the functions that need
it: the nodes import nothing of ComfyUI's at load time, and `install`, `graph` and this package never do.
"""

NODE_PACK = "persres"  # the custom_nodes folder name, the node category and the model attachment key
