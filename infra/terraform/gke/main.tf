# GPU node pool for the covseg training steps.
#
# The node label and taint are NOT written here: they come from infra/gpu_pool.json, the same file
# the pipeline reads (covseg.gpu_pool.load()) to set the GPU steps' nodeSelector and toleration.
# Change them there, and only there.

locals {
  gpu_pool = jsondecode(file("${path.module}/../../gpu_pool.json"))

  # Kubernetes spells taint effects in CamelCase, the GKE API in UPPER_SNAKE_CASE.
  taint_effects = {
    NoSchedule       = "NO_SCHEDULE"
    PreferNoSchedule = "PREFER_NO_SCHEDULE"
    NoExecute        = "NO_EXECUTE"
  }
}

resource "google_container_node_pool" "gpu" {
  name           = var.pool_name
  project        = var.project_id
  location       = var.location
  cluster        = var.cluster_name
  node_locations = length(var.node_locations) > 0 ? var.node_locations : null

  initial_node_count = var.min_nodes

  autoscaling {
    min_node_count = var.min_nodes
    max_node_count = var.max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type = var.machine_type
    spot         = var.spot
    disk_size_gb = var.disk_size_gb
    disk_type    = "pd-balanced"
    oauth_scopes = ["https://www.googleapis.com/auth/cloud-platform"]

    guest_accelerator {
      type  = var.accelerator_type
      count = var.accelerator_count

      gpu_driver_installation_config {
        gpu_driver_version = var.gpu_driver_version
      }
    }

    labels = {
      (local.gpu_pool.node_selector.key) = local.gpu_pool.node_selector.value
    }

    taint {
      key    = local.gpu_pool.toleration.key
      value  = local.gpu_pool.toleration.value
      effect = local.taint_effects[local.gpu_pool.toleration.effect]
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot = true
    }

    metadata = {
      disable-legacy-endpoints = "true"
    }
  }

  lifecycle {
    ignore_changes = [initial_node_count]
  }
}

# Multi-GPU variant for distributed training (one PyTorchJob pod per node, one process per GPU:
# covseg.trainjob). Off by default (multi_gpu_max_nodes = 0). Same label and taint as the pool above, from
# the same gpu_pool.json: the scheduler tells the pools apart by the GPUs a pod requests.
resource "google_container_node_pool" "gpu_multi" {
  count = var.multi_gpu_max_nodes > 0 ? 1 : 0

  name           = var.multi_gpu_pool_name
  project        = var.project_id
  location       = var.location
  cluster        = var.cluster_name
  node_locations = length(var.node_locations) > 0 ? var.node_locations : null

  initial_node_count = 0

  autoscaling {
    min_node_count = 0
    max_node_count = var.multi_gpu_max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type = var.multi_gpu_machine_type
    spot         = var.spot
    disk_size_gb = var.disk_size_gb
    disk_type    = "pd-balanced"
    oauth_scopes = ["https://www.googleapis.com/auth/cloud-platform"]

    guest_accelerator {
      type  = var.multi_gpu_accelerator_type
      count = var.multi_gpu_accelerator_count

      gpu_driver_installation_config {
        gpu_driver_version = var.gpu_driver_version
      }
    }

    labels = {
      (local.gpu_pool.node_selector.key) = local.gpu_pool.node_selector.value
    }

    taint {
      key    = local.gpu_pool.toleration.key
      value  = local.gpu_pool.toleration.value
      effect = local.taint_effects[local.gpu_pool.toleration.effect]
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot = true
    }

    metadata = {
      disable-legacy-endpoints = "true"
    }
  }

  lifecycle {
    ignore_changes = [initial_node_count]
  }
}
