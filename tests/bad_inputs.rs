//! Bad input gets one clear error naming what is wrong — never a panic, a NaN
//! network, or a key silently ignored. One test per class of input.

mod common;
use common::*;

/// A tiny valid UNet config with `extra` (a JSON fragment) merged over it.
fn unet_script(extra: &str) -> String {
    let base = r#""block_out_channels": [8, 16], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "cross_attention_dim": 8,
        "norm_num_groups": 4, "attention_head_dim": 2"#;
    format!(
        "let c = parse_json(`{{{base}}}`); c += parse_json(`{{{extra}}}`); let u = new_unet(c, 1);
         u.forward(randn([1, 4, 8, 8]), 500, #{{ context: randn([1, 3, 8]) }}).mean().item()"
    )
}

#[test]
fn unet_configs_that_would_panic_mislead_or_be_ignored_are_refused_by_name() {
    let host = host();
    // (fragment, what the error must name)
    let cases = [
        (r#""norm_num_groups": 0"#, "norm_num_groups"),
        (r#""attention_head_dim": 0"#, "attention_head_dim"),
        (r#""num_attention_heads": [2, 0]"#, "num_attention_heads"),
        (r#""reverse_transformer_layers_per_block": [1]"#, "reverse_transformer_layers_per_block"),
        (r#""norm_eps": -1"#, "norm_eps"),
        (r#""layers_per_block": 0"#, "layers_per_block"),
        (r#""cross_attention_dim": 0"#, "cross_attention_dim"),
        (r#""in_channels": 0"#, "in_channels"),
        (r#""block_out_channels": [8, 0]"#, "block_out_channels[1]"),
        (r#""conv_in_kernel": 2"#, "conv_in_kernel"),
        (r#""downsample_padding": 2"#, "downsample_padding"),
        (r#""time_embedding_act_fn": "silu""#, "time_embedding_act_fn"),
        (r#""timestep_post_act": "silu""#, "timestep_post_act"),
        (r#""resnet_skip_time_act": true"#, "resnet_skip_time_act"),
        (r#""attention_type": "gated""#, "attention_type"),
        (r#""cross_attention_norm": "group_norm""#, "cross_attention_norm"),
        (r#""dropout": 0.1"#, "dropout"),
        (r#""num_class_embeds": 10"#, "num_class_embeds"),
        (r#""class_embeddings_concat": true"#, "class_embeddings_concat"),
        (r#""encoder_hid_dim_type": "text_proj""#, "encoder_hid_dim_type"),
    ];
    for (fragment, key) in cases {
        match host.eval(&unet_script(fragment)) {
            Ok(v) => panic!("{fragment}: accepted (output mean {v})"),
            Err(e) => assert!(e.message.contains(key), "{fragment}: the error does not name {key}: {}", e.message),
        }
    }
    // The keys sidscript implements are accepted (diffusers parity: tests/unet_parity.rs).
    for fragment in [r#""downsample_padding": 0"#, r#""conv_out_kernel": 5"#, r#""time_embedding_dim": 40"#] {
        let v = host.eval(&unet_script(fragment)).unwrap_or_else(|e| panic!("{fragment}: {}", e.message));
        assert!(v.as_float().unwrap().is_finite(), "{fragment}");
    }
}
