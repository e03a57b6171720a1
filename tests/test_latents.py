"""Latent diffusion: the VAE codec, ``diffusion-transfer-data encode``, latent datamodules, latent DiTs.

Uses a tiny randomly initialised ``AutoencoderKL`` saved to a local folder; skipped when the ``vae`` extra
(diffusers) is not installed.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_transfer.data import DatasetError, DiffusionDataModule, LatentDataset
from diffusion_transfer.data.tool import main as data_tool
from diffusion_transfer.nets.vae import SD_VAE_SCALE, LatentCodec

diffusers = pytest.importorskip("diffusers")


@pytest.fixture
def vae_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    autoencoder = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=16)
    folder = tmp_path / "tiny-vae"
    autoencoder.save_pretrained(folder)
    return folder


def test_codec_scales_and_shapes(vae_folder: Path) -> None:
    codec = LatentCodec.from_folder(vae_folder)
    assert (codec.latent_channels, codec.downsampling, codec.scale) == (4, 2, SD_VAE_SCALE)
    assert not any(p.requires_grad for p in codec.parameters())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = codec.moments(images)
    torch.testing.assert_close(codec.encode(images, sample=False), mean * SD_VAE_SCALE)
    latents = codec.encode(images, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 8, 8) and not torch.equal(latents, mean * SD_VAE_SCALE)
    # decode divides by the scale before running the decoder
    torch.testing.assert_close(codec.decode(latents), codec.autoencoder.decode(latents / SD_VAE_SCALE).sample)
    assert codec.decode(latents).shape == (2, 3, 16, 16)


def test_missing_vae_folder_says_what_to_get(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"lacks config.json and diffusion_pytorch_model.safetensors.*"
                                                r"stabilityai/sd-vae-ft-ema"):
        LatentCodec.from_folder(tmp_path / "nowhere")


def test_encode_command_writes_moments_and_trains_a_latent_dit(shapes_zip: Path, vae_folder: Path,
                                                               tmp_path: Path, capsys) -> None:
    dest = tmp_path / "latents.zip"
    assert data_tool(["encode", str(shapes_zip), str(dest), "--vae", str(vae_folder), "--batch-size", "64"]) == 0
    with zipfile.ZipFile(dest) as archive:
        meta = json.loads(archive.read("dataset.json"))
        assert "00000/img00000000.npy" in archive.namelist()
    assert meta["latents"] == {"scale": SD_VAE_SCALE, "channels": 4, "resolution": 8, "image_resolution": 16,
                               "vae": "tiny-vae", "format": "mean_std"}
    assert meta["class_counts"] == [8] * 20
    dataset = LatentDataset(dest)
    moments, label = dataset[17]
    # The stored moments are the codec's posterior for that image.
    codec = LatentCodec.from_folder(vae_folder)
    from diffusion_transfer.data import ZipImageDataset

    image, image_label = ZipImageDataset(shapes_zip)[17]
    mean, std = codec.moments(image[None].float() / 127.5 - 1)
    torch.testing.assert_close(moments, torch.cat([mean, std], 1)[0])
    assert label == image_label
    assert data_tool(["info", str(dest), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["resolution"] == 8

    dm = DiffusionDataModule(str(dest), batch_size=16)
    assert (dm.resolution, dm.channels, dm.num_classes) == (8, 4, 20)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 4, 8, 8)
    with pytest.raises(DatasetError, match="xflip cannot flip VAE latents"):
        DiffusionDataModule(str(dest), xflip=True).setup("fit")

    import lightning as L

    from diffusion_transfer.methods import Diffusion

    model = Diffusion(arch="DiT-S/2", arch_overrides={"hidden_size": 32, "depth": 2, "num_heads": 2},
                      num_classes=20, resolution=8, channels=4, vae=str(vae_folder), val_num_images=0,
                      sample_steps=4)
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(model, dm)
    images = model.sample(3, seed=0)
    assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1
    assert not any(name.startswith("_codec") for name in model.state_dict())


def test_latent_zip_errors(tmp_path: Path, shapes_zip: Path, vae_folder: Path, capsys) -> None:
    from diffusion_transfer.data import write_dataset_zip

    write_dataset_zip(tmp_path / "bad.zip", [(np.zeros((8, 8, 8), np.float32), 0)],
                      extra={"latents": {"scale": 0.18215, "channels": 4, "resolution": 4}}, latents=True)
    with pytest.raises(DatasetError, match="latent moments have shape"):
        LatentDataset(tmp_path / "bad.zip")[0]
    code = data_tool(["encode", str(shapes_zip), str(tmp_path / "out.zip"), "--vae", str(tmp_path / "none")])
    assert code == 2 and "lacks config.json" in capsys.readouterr().err
    assert not (tmp_path / "out.zip").exists()
