variable "project_id" {
  description = "GCP project that owns the GKE cluster."
  type        = string
}

variable "location" {
  description = "Region or zone of the existing GKE cluster (e.g. europe-west4)."
  type        = string
}

variable "cluster_name" {
  description = "Name of the existing GKE cluster the pool is added to."
  type        = string
}

variable "node_locations" {
  description = "Zones for the GPU nodes; empty = the cluster's zones. Pick zones that offer the accelerator."
  type        = list(string)
  default     = []
}

variable "pool_name" {
  description = "Name of the GPU node pool."
  type        = string
  default     = "covseg-gpu"
}

variable "machine_type" {
  description = "Machine type; must be compatible with the accelerator (g2-* for nvidia-l4)."
  type        = string
  default     = "g2-standard-8"
}

variable "accelerator_type" {
  description = "GKE accelerator type."
  type        = string
  default     = "nvidia-l4"
}

variable "accelerator_count" {
  description = "GPUs per node."
  type        = number
  default     = 1
}

variable "gpu_driver_version" {
  description = "NVIDIA driver GKE installs on the nodes: DEFAULT or LATEST."
  type        = string
  default     = "DEFAULT"

  validation {
    condition     = contains(["DEFAULT", "LATEST"], var.gpu_driver_version)
    error_message = "gpu_driver_version must be DEFAULT or LATEST."
  }
}

variable "min_nodes" {
  description = "Autoscaler minimum per zone (0 = scale to zero between training runs)."
  type        = number
  default     = 0
}

variable "max_nodes" {
  description = "Autoscaler maximum per zone."
  type        = number
  default     = 2
}

variable "spot" {
  description = "Use Spot VMs (cheaper, pre-emptible; training steps must be retryable)."
  type        = bool
  default     = true
}

variable "disk_size_gb" {
  description = "Boot disk size; the CUDA component image is several GB."
  type        = number
  default     = 100
}

# ------------------------------------------------------------------ multi-GPU pool (distributed training)

variable "multi_gpu_max_nodes" {
  description = "Autoscaler maximum of the multi-GPU pool per zone; 0 = no multi-GPU pool. It scales from zero."
  type        = number
  default     = 0
}

variable "multi_gpu_pool_name" {
  description = "Name of the multi-GPU node pool."
  type        = string
  default     = "covseg-gpu-multi"
}

variable "multi_gpu_machine_type" {
  description = "Machine type of the multi-GPU pool; must carry multi_gpu_accelerator_count accelerators."
  type        = string
  default     = "g2-standard-48"
}

variable "multi_gpu_accelerator_type" {
  description = "GKE accelerator type of the multi-GPU pool."
  type        = string
  default     = "nvidia-l4"
}

variable "multi_gpu_accelerator_count" {
  description = "GPUs per node of the multi-GPU pool (the PyTorchJob's gpus_per_node at most)."
  type        = number
  default     = 4
}
