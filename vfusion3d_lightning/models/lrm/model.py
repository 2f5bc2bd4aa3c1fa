"""The VFusion3D Large Reconstruction Model as a plain nn.Module."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vfusion3d_lightning import hub
from vfusion3d_lightning.cameras import SOURCE_CAMERA_DIM
from vfusion3d_lightning.io import atomic_write_folder
from vfusion3d_lightning.models.lrm.config import LRMConfig
from vfusion3d_lightning.models.lrm.convert import convert_released_lrm, hf_dinov2_to_timm, is_released_state_dict
from vfusion3d_lightning.models.lrm.encoder import DinoEncoder
from vfusion3d_lightning.models.lrm.lora import LoraOptions, add_lora, merge_lora
from vfusion3d_lightning.models.lrm.renderer import (
    Occupancy,
    RenderOutput,
    TriplaneDecoder,
    VolumeRenderer,
    density_activation,
)
from vfusion3d_lightning.models.lrm.transformer import CameraEmbedder, TriplaneTransformer

WEIGHTS_NAME, CONFIG_NAME, README_NAME = "model.safetensors", "config.json", "README.md"
EXPECTED_SOURCES = ("a save_pretrained folder, the released checkpoint or another weights file, a Lightning .ckpt "
                    "of LRMModule, a Hugging Face Hub repo id (facebook/vfusion3d) or a registry name "
                    "(`vfusion3d-lightning weights` lists them)")
HUB_FILES = (WEIGHTS_NAME, CONFIG_NAME)  # what a Hub repo of an LRM holds: ours, or the release's LRMGenerator
DINOV2_SOURCE = ("https://huggingface.co/facebook/dinov2-base (file model.safetensors; or timm's "
                 "vit_base_patch14_dinov2.lvd142m)")

# layers whose weights autocast casts to its dtype (with their inputs) on every call
AUTOCAST_CAST_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


class LRM(hub.PushToHubMixin, nn.Module):
    """Image + source camera -> triplane; triplane + render cameras -> images; points -> density, colour.

    >>> model = LRM(LRMConfig.from_name("tiny"))
    >>> planes = model(image, canonical_source_camera(len(image)))       # (B, 3, C, H, W)
    >>> out = model.render(planes, turntable_cameras(8)[None], size=64)  # out.rgb: (B, 8, 3, 64, 64)
    """

    def __init__(self, config: LRMConfig | None = None):
        super().__init__()
        self.config = config = config or LRMConfig.from_name("vfusion3d")
        self.encoder = DinoEncoder(config.encoder_name, config.encoder_overrides)
        self.camera_embedder = CameraEmbedder(SOURCE_CAMERA_DIM, config.camera_embed_dim)
        self.transformer = TriplaneTransformer(
            dim=config.transformer_dim,
            context_dim=self.encoder.feature_dim,
            mod_dim=config.camera_embed_dim,
            layers=config.transformer_layers,
            heads=config.transformer_heads,
            low_res=config.triplane_low_res,
            triplane_dim=config.triplane_dim,
            eps=config.transformer_eps,
            mlp_ratio=config.mlp_ratio,
        )
        self.decoder = TriplaneDecoder(3 * config.triplane_dim, config.decoder_hidden_dim, config.decoder_layers)
        self.renderer = VolumeRenderer(config.coarse_samples, config.importance_samples, config.box_size,
                                       config.white_background)
        self.network_weights_dtype: torch.dtype | None = None  # set by `cast_network_weights`

    def forward(self, image: torch.Tensor, source_camera: torch.Tensor) -> torch.Tensor:
        """image: (B, 3, H, W) RGB in [0, 1]; source_camera: (B, 16) -> planes (B, 3, C, 2r, 2r)."""
        if source_camera.ndim != 2 or source_camera.shape[-1] != SOURCE_CAMERA_DIM:
            raise ValueError(f"source_camera must be (B, {SOURCE_CAMERA_DIM}), got shape {tuple(source_camera.shape)}")
        if image.shape[0] != source_camera.shape[0]:
            raise ValueError(f"{image.shape[0]} images but {source_camera.shape[0]} source cameras")
        held = self.network_weights_dtype
        if held is not None and not (torch.is_autocast_enabled(image.device.type)
                                     and torch.get_autocast_dtype(image.device.type) == held):
            raise RuntimeError(f"this LRM holds its network weights in {held} (cast_network_weights): run it under "
                               f"torch.autocast({image.device.type!r}, dtype={held}), or load it again to run in "
                               "another precision")
        # on the CPU only: on a GPU the check would stall every step on the host (the data modules check)
        if source_camera.device.type == "cpu" and not bool(torch.isfinite(source_camera).all()):
            raise ValueError("source_camera holds NaN or inf values")
        return self._planes(image, source_camera)

    def _planes(self, image: torch.Tensor, source_camera: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(image)
        return self.transformer(tokens, self.camera_embedder(source_camera.to(tokens.dtype)))

    def render(
        self,
        planes: torch.Tensor,
        render_cameras: torch.Tensor,
        size: int,
        patch: tuple[int, int, int] | None = None,
        generator: torch.Generator | None = None,
        max_rays: int | None = None,
        occupancy: Occupancy | None = None,
    ) -> RenderOutput:
        """Volume-render views of `planes`.

        planes: (B, 3, C, H, W); render_cameras: (B, V, 25); size: full render resolution;
        patch: (x0, y0, patch_size) renders only that square of the size x size image.
        occupancy: from `occupancy(planes)`: samples in its empty cells are skipped (inference).
        -> RenderOutput: rgb (B, V, 3, h, w), depth (B, V, 1, h, w), opacity (B, V, 1, h, w).
        """
        return self.renderer(planes, self.decoder, render_cameras, size, patch, generator, max_rays, occupancy)

    def occupancy(self, planes: torch.Tensor, resolution: int = 128, threshold: float | None = None) -> Occupancy:
        """Where `planes` hold density, for `render(..., occupancy=)` (see `VolumeRenderer.occupancy`)."""
        return self.renderer.occupancy(planes, self.decoder, resolution, threshold)

    def query(self, planes: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Activated density (B, M, 1) and colour (B, M, 3) at points (B, M, 3) in the box."""
        if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] != planes.shape[0]:
            raise ValueError(f"points must be (B={planes.shape[0]}, M, 3), got shape {tuple(points.shape)}")
        raw_sigma, rgb = self.renderer.query(planes, self.decoder, points)
        return density_activation(raw_sigma), rgb

    def compile_for_speed(self, cuda_graphs: bool = False) -> "LRM":
        """torch.compile the encoder, the transformer and the ray renderer, in place (the parts that pay off:
        BENCHMARKS.md). Returns the model.

        cuda_graphs: compile image -> planes as one function replayed as a CUDA graph (inference): at batch 1
        launching its kernels took the CPU longer than the GPU took to run them. A replay overwrites the
        planes of the call before, so copy planes you keep."""
        if cuda_graphs:
            graphed = torch.compile(self._planes, mode="reduce-overhead")

            def planes_replayed(image: torch.Tensor, source_camera: torch.Tensor) -> torch.Tensor:
                torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: earlier outputs may go
                return graphed(image, source_camera)

            self._planes = planes_replayed
        else:
            self.compile_network()
        self.renderer.render_rays = torch.compile(self.renderer.render_rays)
        return self

    def cast_network_weights(self, dtype: torch.dtype) -> "LRM":
        """Hold the weights of the image -> planes network's matrix products (the linear and convolution layers
        of the encoder, camera embedder and transformer) in `dtype`, for inference under autocast to `dtype`.
        Autocast casts them on every call otherwise: 0.8 of 8.3 ms of GPU time for image -> planes on an H100
        (BENCHMARKS.md). The planes are the same bits, since autocast makes the same casts. Norms, position
        embeddings and the decoder keep their dtype. The network then runs only under that autocast. Returns
        the model."""
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"cast_network_weights takes torch.bfloat16 or torch.float16 (an autocast dtype), got "
                             f"{dtype}")
        for part in (self.encoder, self.camera_embedder, self.transformer):
            for module in part.modules():
                if isinstance(module, AUTOCAST_CAST_LAYERS):
                    module.to(dtype)
        self.network_weights_dtype = dtype
        return self

    def compile_network(self) -> None:
        """torch.compile each encoder and transformer block in place, parameter names unchanged (training,
        through `LRMModule(compile_network=True)`, and `compile_for_speed`). Block by block, so that gradient
        checkpointing stays outside the compiled code: compiling the whole transformer around it kept 40.8 GiB
        at batch 16 where blocks keep 29.5, at the same speed (BENCHMARKS.md)."""
        for block in [*self.encoder.vit.blocks, *self.transformer.blocks]:
            block.compile()

    def set_gradient_checkpointing(self, enabled: bool | str = True, renderer: bool | None = None,
                                   transformer_blocks: int | None = None) -> None:
        """Recompute encoder and transformer blocks, and each renderer pass of `max_rays` rays (`renderer`,
        by default as `enabled`), in the backward pass: less memory, more compute. enabled="selective"
        recomputes only the blocks' elementwise work (`transformer.checkpoint_block`), not the renderer.
        transformer_blocks: recompute only the first this many transformer blocks (None: all); the encoder's
        blocks, which free more memory for their recompute time, are recomputed whenever `enabled`."""
        if enabled not in (True, False, "selective"):
            raise ValueError(f"enabled must be true, false or 'selective', got {enabled!r}")
        layers = len(self.transformer.blocks)
        if transformer_blocks is not None and enabled is False:
            raise ValueError(f"transformer_blocks={transformer_blocks} (LRMModule's recompute_blocks) picks blocks to "
                             "recompute, so it needs checkpointing on: set gradient_checkpointing, or leave it None")
        if transformer_blocks is not None and not 0 <= transformer_blocks <= layers:
            raise ValueError(f"transformer_blocks must be None or 0..{layers} (the transformer's blocks), got "
                             f"{transformer_blocks!r}")
        self.transformer.gradient_checkpointing = enabled
        self.transformer.recompute_blocks = transformer_blocks
        self.encoder.gradient_checkpointing = enabled
        if renderer is None:
            renderer = enabled is True
        self.renderer.gradient_checkpointing = renderer

    # ------------------------------------------------------------------ persistence

    def load_encoder_weights(self, source: str | Path, checkpoint_dir: str | Path | None = None) -> None:
        """Load pretrained DINOv2 weights (transformers or timm names) into the encoder.

        Args:
            source: a weights file, or a registry name such as "dinov2-base".
            checkpoint_dir: where registry names resolve (default: `hub.checkpoint_dir()`).
        """
        _, path = hub.locate_weights(source, checkpoint_dir, what="DINOv2 encoder weights", converters=("dinov2_hf",),
                                     fetch=DINOV2_SOURCE)
        state = hub.load_state_file(path)
        if any(k.startswith("embeddings.") for k in state):
            state = hf_dinov2_to_timm(state)
        hub.load_state_into(self.encoder.vit, state, path)

    def save_pretrained(self, directory: str | Path, card_data: dict | None = None) -> Path:
        """Write `model.safetensors`, `config.json` and a `README.md` model card into `directory`, replacing an
        earlier save only once every new file is written (`io.atomic_write_folder`). `push_to_hub(repo_id)`
        uploads the same files.

        Args:
            directory: the folder; created if absent.
            card_data: what the model card records besides the sizes (`hub.model_card`: license, training data,
                recipe, metrics); "not recorded" where absent.
        """
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        card = hub.model_card(
            "VFusion3D LRM",
            f"An image-to-3D Large Reconstruction Model (VFusion3D, Meta 2024): one image -> a triplane -> volume "
            f"renders and meshes. {sum(t.numel() for t in tensors.values()):,} parameters; encoder "
            f"{self.config.encoder_name}, {self.config.transformer_layers} transformer layers of width "
            f"{self.config.transformer_dim}, triplane {self.config.triplane_high_res}^2 x {self.config.triplane_dim}.",
            "from vfusion3d_lightning import LRM\n\nmodel = LRM.from_pretrained(FOLDER).eval()",
            {CONFIG_NAME: "the network's sizes (LRMConfig)", WEIGHTS_NAME: "the weights"},
            pipeline_tag="image-to-3d", tags=("lrm", "triplane", "nerf"), card_data=card_data)

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            self.config.save(tmp / CONFIG_NAME)
            (tmp / README_NAME).write_text(card)

        return atomic_write_folder(directory, write, last=(WEIGHTS_NAME,))

    @classmethod
    def from_pretrained(cls, source: str | Path, config: LRMConfig | None = None,
                        checkpoint_dir: str | Path | None = None, *, revision: str | None = None,
                        cache_dir: str | Path | None = None, token: str | bool | None = None) -> "LRM":
        """Load an LRM.

        Args:
            source: a `save_pretrained` folder (or the model.safetensors in it), a Hugging Face Hub repo id
                ("facebook/vfusion3d": the release's model.safetensors and config.json, or a repo push_to_hub
                wrote), a registry name ("vfusion3d"), a Lightning `.ckpt` of `LRMModule`, the released VFusion3D
                checkpoint (`vfusion3dckpt` or a `.pth` whose `model_state_dict` has the released names), or a
                weights file with our names. An existing path wins over a repo id of the same spelling.
            config: the network's sizes; default: the folder's config.json (ours, or the release's), the
                checkpoint's `network`, the registry entry's preset, or the released network for released weights.
            checkpoint_dir: where registry names resolve (default: `hub.checkpoint_dir()`).
            revision: a Hub repo's branch, tag or commit (default: main).
            cache_dir: the Hugging Face cache (default: $HF_HUB_CACHE, else huggingface_hub's default);
                $HF_HUB_OFFLINE=1 reads only the cache.
            token: a Hub token, for private or gated repos.
        """
        entry, path = hub.locate_weights(source, checkpoint_dir, what="LRM weights", expected=EXPECTED_SOURCES,
                                         converters=("vfusion3d_released", "lrm"), hub_files=HUB_FILES,
                                         revision=revision, cache_dir=cache_dir, token=token)
        if entry is not None and entry.config:
            config = config or LRMConfig.from_name(entry.config)
        lora = None  # a LoRA fine-tune's checkpoint: its adapters, merged into the weights once loaded
        if hub.is_lightning_checkpoint(path):
            checkpoint = hub.read_lightning_checkpoint(path, "LRMModule", ["network"],
                                                       fit_config="configs/lrm/tiny.yaml")
            network = checkpoint.hparams["network"]
            if config is None and not isinstance(network, dict):
                raise ValueError(f"{path}: hyper-parameter `network` is a {type(network).__name__}, not the dict "
                                 "LRMModule saves; pass config=LRMConfig(...)")
            config, state = config or LRMConfig.from_dict(network), checkpoint.state
            lora = checkpoint.hparams.get("lora")
        else:
            if path.is_dir():
                weights = path / WEIGHTS_NAME
                if not weights.is_file():
                    raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}; it is not a save_pretrained folder")
                path = weights
            if config is None and path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file():
                config = LRMConfig.load(path.parent / CONFIG_NAME)
            state = _unwrap_released(hub.load_state_file(path), path)
            if is_released_state_dict(state):  # the .pth and the Hub's safetensors, with or without a prefix
                state = convert_released_lrm(state)
                config = config or LRMConfig.from_name("vfusion3d")
            elif config is None:
                raise ValueError(f"{path} has our parameter names but no {CONFIG_NAME} beside it; pass "
                                 "config=LRMConfig(...) or LRMConfig.from_name(...)")
        model = cls.with_weights(config, state, path, lora)
        return merge_lora(model) if lora else model

    @classmethod
    def with_weights(cls, config: LRMConfig, state: dict[str, torch.Tensor], source: str | Path,
                     lora: dict | None = None) -> "LRM":
        """An LRM of `config` holding `state` (from `source`, named in errors); with `lora` (LoraOptions fields, as
        an LRMModule's hyper-parameters hold them) its adapters are added first, and left unmerged."""
        model = cls(config)
        if lora:
            add_lora(model, LoraOptions(**lora))
        hub.load_state_into(model, state, source, hint="check that the config matches the weights (e.g. "
                                                       "LRMConfig.from_name('vfusion3d') for the released model)")
        return model


def _unwrap_released(payload: dict, path: Path) -> dict[str, torch.Tensor]:
    if "model_state_dict" in payload:
        return payload["model_state_dict"]
    if all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload
    raise ValueError(
        f"{path} holds {sorted(payload)[:8]}, neither a `model_state_dict` (released VFusion3D checkpoint) nor "
        "a plain state dict"
    )
