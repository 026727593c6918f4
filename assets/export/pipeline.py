# A few-step SiD generator's sampler for diffusers, written by sidscript's export.
#
#   pipe = DiffusionPipeline.from_pretrained(FOLDER, custom_pipeline=FOLDER, trust_remote_code=True)
#   image = pipe("a photo of a cat", num_inference_steps=1).images[0]
#
# The chain (spec: Score identity Distillation, few-step form): x = sigma(t_0) * z at
# t_0 = t_init; each step predicts x0 = f(x, t_i, c) with the generator (no guidance)
# and, before the next step, re-noises it to t_{i+1} = floor(t_init * (1 - (i+1)/n)):
# x = alpha(t_{i+1}) * x0 + sigma(t_{i+1}) * noise, with fresh noise ("fresh", as in
# training), z again ("fixed"), or the noise the previous step implies ("ddim").
# alpha, sigma are sqrt(alphas_cumprod) and sqrt(1 - alphas_cumprod) of the folder's
# scheduler. The last x0 is decoded by the VAE.
import math
from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

# The run's settings, filled in at export.
T_INIT = {t_init}
STEPS = {steps}
RENOISE = "{renoise}"


def step_timesteps(t_init: int, n: int) -> List[int]:
    """t_i = floor(t_init * (1 - i/n)), i = 0..n-1, as sidscript computes it (f64)."""
    return [int(math.floor(t_init * (1.0 - i / n))) for i in range(n)]


class SiDPipeline(DiffusionPipeline):
    _optional_components = ["text_encoder_2", "tokenizer_2", "safety_checker", "feature_extractor", "image_encoder"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, text_encoder_2=None, tokenizer_2=None,
                 safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
                 force_zeros_for_empty_prompt=True):
        super().__init__()
        # Every component the teacher's model_index.json may list is registered (the
        # safety checker, feature extractor and image encoder are not used here).
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, safety_checker=safety_checker,
                              feature_extractor=feature_extractor, image_encoder=image_encoder)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def _prompt_pipeline(self):
        # The stock pipelines' prompt encoding, over these components (no copy).
        if self.text_encoder_2 is None:
            return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                           unet=self.unet, scheduler=self.scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        return StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoder,
                                         text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
                                         tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=self.scheduler)

    def encode(self, prompts: List[str], device):
        helper = self._prompt_pipeline()
        if self.text_encoder_2 is None:
            embeds, _ = helper.encode_prompt(prompts, device, 1, False)
            return embeds, {}
        embeds, _, pooled, _ = helper.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
        size = self.unet.config.sample_size * self.vae_scale_factor
        ids = helper._get_add_time_ids((size, size), (0, 0), (size, size), dtype=embeds.dtype,
                                       text_encoder_projection_dim=self.text_encoder_2.config.projection_dim)
        return embeds, {"text_embeds": pooled, "time_ids": ids.to(device).repeat(len(prompts), 1)}

    def x0(self, x, eps, t):
        a, s = self.alpha_sigma(t, x)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return (x - s * eps) / a
        if kind == "v_prediction":
            return a * x - s * eps
        if kind == "sample":
            return eps
        raise ValueError(f"prediction_type {kind}")

    def alpha_sigma(self, t, like):
        ac = self.scheduler.alphas_cumprod.to(torch.float64)[t]
        return (ac.sqrt().to(like.dtype).to(like.device), (1.0 - ac).sqrt().to(like.dtype).to(like.device))

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]], num_inference_steps: Optional[int] = None,
                 t_init: Optional[int] = None, renoise: Optional[str] = None,
                 generator: Optional[torch.Generator] = None, latents: Optional[torch.Tensor] = None,
                 noises: Optional[List[torch.Tensor]] = None, output_type: str = "pil", return_dict: bool = True):
        """Samples the generator in `num_inference_steps` (1..; default the K it was
        trained for) steps of its chain. `latents`: the unit noise z (else drawn from
        `generator`); `noises`: the n - 1 fresh-noise tensors (else drawn);
        output_type "latent" returns the final x0 latents."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = num_inference_steps or STEPS
        t_init = T_INIT if t_init is None else t_init
        renoise = renoise or RENOISE
        device = self._execution_device
        embeds, added = self.encode(prompts, device)
        dtype = self.unet.dtype
        c, h = self.unet.config.in_channels, self.unet.config.sample_size
        shape = (len(prompts), c, h, h)
        z = latents.to(device, dtype) if latents is not None else randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        ts = step_timesteps(t_init, n)
        x = z * self.alpha_sigma(ts[0], z)[1]
        x0 = None
        for i, t in enumerate(ts):
            tt = torch.full((len(prompts),), t, device=device, dtype=torch.long)
            out = self.unet(x, tt, encoder_hidden_states=embeds.to(dtype), added_cond_kwargs=added or None).sample
            x0 = self.x0(x, out, t)
            if i + 1 < n:
                if renoise == "fresh":
                    eps = noises[i].to(device, dtype) if noises is not None else randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                elif renoise == "fixed":
                    eps = z
                elif renoise == "ddim":
                    a, s = self.alpha_sigma(t, x)
                    eps = (x - a * x0) / s
                else:
                    raise ValueError(f"renoise {renoise}: fresh, fixed or ddim")
                a, s = self.alpha_sigma(ts[i + 1], x)
                x = a * x0 + s * eps
        if output_type == "latent":
            images = x0
        else:
            images = self.vae.decode(x0 / self.vae.config.scaling_factor).sample
            images = self.image_processor.postprocess(images, output_type=output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
